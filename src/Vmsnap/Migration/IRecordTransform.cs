namespace Vmsnap.Migration;

/// <summary>
/// Changes or looks at records while a stream is copied (<see cref="MigrationStream"/>'s copy): what it returns is
/// written in place of the record. The record's length must stay as it was.
/// </summary>
internal interface IRecordTransform
{
    MigrationRecord Apply(MigrationRecord record);
}
